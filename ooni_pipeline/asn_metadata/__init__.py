"""ASN metadata updater: the AS-to-organisation map, weekly."""
