"""The performance model, one owner per figure: the bytes a packet carries and what each mode sends per step
(traffic.py), a network's pieces measured as a stage runs them (profile.py), activation memory counted exactly
(activations.py), a module's seconds, activation and parameter bytes predicted from a profile (cost.py), and a
device's memory and step (device.py). The balanced partitions, the planner, the benchmark and the classic
pipeline ask these."""
