"""Test-list updater: the CitizenLab test lists, every 30 minutes."""
