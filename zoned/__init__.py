"""zoned: run untrusted workloads in zones, small VMs with their own hardened kernel."""
