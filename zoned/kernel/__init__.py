"""The guest kernel: config fragments, the verified build and the kernel store."""
