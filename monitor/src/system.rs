//! Host set-up the probes need (tracefs, memlock).
