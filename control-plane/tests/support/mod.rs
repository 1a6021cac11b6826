//! Private service instances for tests that stop, restart or flush a service: they never touch
//! the shared PostgreSQL and Redis of the machine.

#![allow(dead_code)] // each test binary uses a part of this module

pub mod private_postgres;
pub mod private_redis;

use std::net::TcpListener;

/// A TCP port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
