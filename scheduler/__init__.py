"""The embedded scheduler: reconciler, policies, probes and the Docker runtime."""
