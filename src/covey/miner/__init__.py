"""The miner: connects out to a coordinator and runs jobs on local backends."""
