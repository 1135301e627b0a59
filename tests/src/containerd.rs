//! A private containerd (own config, root, state and socket) for tests.
