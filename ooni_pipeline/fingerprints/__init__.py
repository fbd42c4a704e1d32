"""Fingerprint updater: DNS and HTTP blocking fingerprints, hourly."""
