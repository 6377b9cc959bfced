"""The ModelDeployment API types."""
