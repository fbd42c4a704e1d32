"""GeoIP downloader: the monthly IP-to-country+ASN mmdb, weekly on Sunday."""
