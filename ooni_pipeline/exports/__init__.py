"""Exports for the public: the daily website-metrics CSV."""
