//! The device simulator.
