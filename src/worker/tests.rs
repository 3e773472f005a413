//! Unit tests of `worker/mod.rs`.

use super::deliveries_in_flight;
use crate::config::Settings;

#[test]
fn deliveries_in_hand_are_half_as_many_again_as_the_calls_except_at_one() {
    let mut w = Settings::load_from(None, &Default::default())
        .expect("defaults load")
        .worker;
    w.concurrency = 1;
    assert_eq!(
        deliveries_in_flight(&w, 64),
        1,
        "one at a time, in queue order"
    );
    w.concurrency = 32;
    assert_eq!(
        deliveries_in_flight(&w, 64),
        48,
        "half as many again as the calls"
    );
    assert_eq!(
        deliveries_in_flight(&w, 40),
        40,
        "at most what the broker hands over"
    );
    // A prefetch below the concurrency (against the advice) still lets every call run.
    assert_eq!(deliveries_in_flight(&w, 8), 32);
}
