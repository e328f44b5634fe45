"""The `metaloom` command line tools: budget, classify, patchset check."""
