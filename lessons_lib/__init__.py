"""lessons_lib: the small, tested library behind the model-compression course.

Import modules by name (``from lessons_lib import measure``); importing the package does nothing
else: no seeding, no backend flags, no warning filters.
"""

__version__ = "0.1.0"
