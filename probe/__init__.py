"""Running models: head salience sweeps, evaluation, fine-tuning's loop, model loading."""
from probe.errors import interrupt_quietly_while_importing

interrupt_quietly_while_importing()  # python -m probe.X: a Ctrl-C while its modules import ends as one in its run
