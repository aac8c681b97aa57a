from kdsweep.cli import entry

entry()
