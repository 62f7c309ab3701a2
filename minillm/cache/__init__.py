"""Where KV lives: the pool of token slots, the radix tree over it, and the disk tier below it."""
