//! Finding the target process, and noticing when it restarts.
