from fewstep.teachers.base import EMATeacher, FrozenTeacher, RngState, StudentTeacher, Teacher

__all__ = ["Teacher", "EMATeacher", "FrozenTeacher", "StudentTeacher", "RngState"]
