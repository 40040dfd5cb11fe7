"""rrscale: tune and scale relational reasoning and GEDI self-supervised learning."""

__version__ = "0.1.0"
