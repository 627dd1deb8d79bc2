"""What every recipe and the launcher share, engine-free: rendezvous from the environment, the
preemption watch, monitoring, atomic writes, run identity, pause points for tests, recipe files and the
schema, one clean error per failure. Imports nothing else of this project."""
