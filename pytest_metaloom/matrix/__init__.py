"""The scenario matrix: scenarios as data and the runner that turns one into facts."""
