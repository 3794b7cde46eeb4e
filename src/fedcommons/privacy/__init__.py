"""Differential privacy and secure aggregation (client DP-SGD, central DP, ledger, audits).

Nothing here yet: the foundation runs without DP. See the differential-privacy and
secure-aggregation issues for what lands in this package.
"""
