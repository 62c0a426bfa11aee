"""Reading and writing checkpoints: shift, merges, trajectories, fine-tuning, the replication driver."""
from probe.errors import interrupt_quietly_while_importing

interrupt_quietly_while_importing()  # python -m analyses.X: a Ctrl-C while its modules import ends as one in its run
