//! Certificates of the fleet.
