"""Checking privacy claims from the outside: what an auditor runs against a release.

- :mod:`~fedcommons.privacy.audits.ledger_audit`: ``audit_ledger`` recomputes a line's
  ledger (hash chain, signed entry hashes, sensitivity, noise, ε with dp-accounting).
- :mod:`~fedcommons.privacy.audits.canary`: the one-run canary audit (an empirical lower
  bound on ε, Steinke et al. 2023).
- :mod:`~fedcommons.privacy.audits.seeded_bugs`: the seedable privacy bugs the canary
  audit must catch (never active unless a test or benchmark turns one on).
"""
