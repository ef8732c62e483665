"""Scaling-law fits per shape and adaptive shape schedules derived from them.

``laws`` (F1, M4 with closed-form g(E) and r(E)), ``fit`` (robust fits, form selection, bootstrap),
``schedule`` (the DP over shapes, budget mode, bootstrap report), ``project`` (tier A / B to a target).
"""
