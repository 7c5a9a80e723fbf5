"""arbor's Ansible glue: what its plugins share (imported by them, never
loaded by Ansible as a plugin)."""
