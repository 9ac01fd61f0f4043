"""The plant side: `coilsight bridge` (one agent's events into MQTT, at least once) and `coilsight
aggregate` (one coil across several boxes). Separate processes; the agent's service never imports
this package (tests/test_layering.py), and to the agent each is just another subscriber."""
