"""The operator: kopf handlers, reconcile, the optimizer loop and the one actuation path."""
