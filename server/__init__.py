"""fedstill's coordinator side: the ServerApp, round loop, student distillation and run reports."""
