"""Tasks: what an example holds, how it is predicted and scored, what is monitored (see ``tasks.base``)."""

from rag_lightning.tasks.base import TASKS, Task, build_task, register

__all__ = ["TASKS", "Task", "build_task", "register"]
