"""safetylab: measure and manage the safety of machine-learning models.

Align a model, stress-test it, understand it, verify what can be verified and deploy it
under control, with one report that ties the evidence together.
"""

__version__ = "0.1.0"
