"""Everything that knows the running kernel: readers of KSM sysfs, procfs and
page maps, the knob writer, header/tracefs set-up, and the capability module
(the one place that decides how each KSM stage is observed).

Every reader takes a `root` path ("/" on a live host) so unit tests can feed
fixtures recorded from a real kernel.
"""
