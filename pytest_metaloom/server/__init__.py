"""The live server: the tiny model, the process, ports, the reaper, and LiveServer."""
