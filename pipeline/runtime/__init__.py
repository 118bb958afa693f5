"""What a batch passes through in every mode (sequential, pipeline, K x R, DDP): the run's order, the first
stage's inbox, messages and packets, the codec and the transport, the stage loop and its schedules, the module
worker and its optimizer, the report, checkpoints and the topology; assemble.py builds one process's part."""
