"""berth: one multi-GPU server as a private model-serving platform.

berth's modules live in the repository's top-level folders (daemon/, scheduler/, gpu/,
store/, the layout of the design contract) and are imported as berth.daemon, berth.scheduler,
berth.gpu and berth.store: names no other distribution uses (python-daemon owns `daemon`).
In the source tree these are symbolic links; an installed berth has real folders here.
"""
