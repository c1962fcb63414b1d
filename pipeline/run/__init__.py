"""Running a pipeline: the launchers (processes, torchrun, threads), a stage process's start-up, control, restarts, interrupts and injected faults."""
