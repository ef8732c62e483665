"""Scaling-law fits per shape and adaptive shape schedules derived from them."""
