"""Event sources: the only layer that imports bcc.

live (BPF programs from bpf/), sysfs-only (counter polling, no root needed)
and replay (a recording). `trial` proves BPF mechanisms for the capability
module by really loading and attaching tiny programs.
"""
