"""fedstill's framework-free core, shared by server and institutions."""
