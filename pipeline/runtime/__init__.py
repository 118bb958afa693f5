"""The three ways to run a config: sequential (the reference), pipeline stage, ddp."""
