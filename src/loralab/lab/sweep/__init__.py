"""Running a sweep: the plan (built once), executors (local, Ray), the sweep itself, its dry run, the store's lock."""
