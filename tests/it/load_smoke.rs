//! The CI smoke load: a few hundred simulated devices through the whole onboarding path with
//! `fleet-sim load`'s library function; the report must be complete and free of errors. No
//! figure of speed is asserted.

use fleet_sim::{run_load, LoadOptions, MeasuredProcess};
use fleet_tests::TestFleet;

const STATIONS: usize = 150;
const PHONES: usize = 50;
const CUT: usize = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_smoke_load_onboards_every_device_without_errors() {
    // fleetd's default [limits]: the load spreads its devices over loopback addresses, as a
    // fleet of many sites, and paces its accepts to the operator's command budget.
    let fleet = TestFleet::start().await;
    let state = tempfile::tempdir().expect("state dir");
    let mut opts = LoadOptions::new(fleet.server(), fleet.data_dir());
    opts.stations = STATIONS;
    opts.phones = PHONES;
    opts.concurrency = 50;
    opts.accept_batch = 20;
    opts.state_dir = state.path().to_owned();
    opts.reconnect = true;
    opts.cut_sample = CUT;
    opts.fleetd_pid = Some(std::process::id());
    opts.progress = false;

    let report = run_load(opts).await.expect("load runs");
    eprintln!(
        "{}",
        serde_json::to_string_pretty(&report).expect("report as JSON")
    );

    assert!(report.errors.is_empty(), "errors: {:?}", report.errors);
    assert_eq!(report.stations, STATIONS);
    assert_eq!(report.phones, PHONES);
    assert_eq!(report.stations_authorized, STATIONS);
    assert_eq!(report.phones_provisioned, PHONES);
    assert_eq!(report.connect_ms.count, STATIONS as u64);
    assert_eq!(report.accept_to_authorized_ms.count, STATIONS as u64);
    assert_eq!(report.provision_ms.count, PHONES as u64);
    assert_eq!(report.reject_to_cut_ms.count, CUT as u64);
    assert!(report.seconds > 0.0);
    assert!(report.onboarded_per_s > 0.0);
    let storm = report.reconnect.as_ref().expect("reconnect storm");
    assert_eq!(storm.stations, STATIONS);
    assert_eq!(storm.connected, STATIONS);
    assert_eq!(storm.connect_ms.count, STATIONS as u64);
    // The test process is fleetd here: its memory is read from /proc.
    assert!(report.fleetd_rss_kib.is_some_and(|k| k > 0));
    assert!(report.fleetd_rss_kib_per_device.is_some_and(|k| k > 0.0));
    // So is its CPU time (the simulator's included: it runs in this process too).
    assert!(report.fleetd_cpu_ms_per_device.is_some_and(|ms| ms > 0.0));

    let json = serde_json::to_value(&report).expect("report as JSON");
    for key in [
        "stations",
        "phones",
        "seconds",
        "onboarded_per_s",
        "connect_ms",
        "accept_to_authorized_ms",
        "reject_to_cut_ms",
        "errors",
        "fleetd_rss_kib",
        "fleetd_rss_kib_per_device",
        "fleetd_cpu_ms_per_device",
        "reconnect",
    ] {
        assert!(json.get(key).is_some(), "no {key:?} in {json}");
    }
    for latency in [
        &json["connect_ms"],
        &json["accept_to_authorized_ms"],
        &json["reject_to_cut_ms"],
        &json["reconnect"]["connect_ms"],
    ] {
        for field in ["p50", "p99", "max"] {
            assert!(latency[field].is_number(), "no {field} in {latency}");
        }
    }
    assert_eq!(json["errors"], serde_json::json!({}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_over_two_servers_reports_each_named_process() {
    // The one fleetd twice in the server list stands for two edges: the devices alternate
    // between the two addresses, and both named "edges" are this test process.
    let fleet = TestFleet::start().await;
    let state = tempfile::tempdir().expect("state dir");
    let mut opts = LoadOptions::new(fleet.server(), fleet.data_dir());
    opts.servers.push(fleet.server());
    opts.stations = 5;
    opts.phones = 2;
    opts.concurrency = 10;
    opts.cut_sample = 1;
    opts.state_dir = state.path().to_owned();
    let me = std::process::id();
    opts.processes = vec![
        MeasuredProcess {
            edge: Some(0),
            ..MeasuredProcess::new("edge-a", me)
        },
        MeasuredProcess {
            edge: Some(1),
            ..MeasuredProcess::new("edge-b", me)
        },
    ];

    let report = run_load(opts).await.expect("load runs");
    assert!(report.errors.is_empty(), "errors: {:?}", report.errors);
    assert_eq!(report.stations_authorized, 5);
    assert_eq!(report.phones_provisioned, 2);
    assert_eq!(report.servers, [fleet.server(), fleet.server()]);
    // Without --fleetd-pid, fleetd's own figures stay unmeasured.
    assert_eq!(report.fleetd_rss_kib, None);
    assert_eq!(report.fleetd_cpu_ms_per_device, None);

    let names: Vec<&str> = report.processes.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["edge-a", "edge-b"]);
    // Seven devices in turn over two servers: four to the first, three to the second.
    let devices: Vec<Option<usize>> = report.processes.iter().map(|p| p.devices).collect();
    assert_eq!(devices, [Some(4), Some(3)]);
    for process in &report.processes {
        assert_eq!(process.pid, me);
        assert_eq!(process.server.as_deref(), Some(fleet.server().as_str()));
        let cpu = process.cpu_ms.expect("CPU time measured");
        assert!(cpu > 0.0, "{process:?}");
        let per_device = process.cpu_ms_per_device.expect("per device");
        assert!((per_device - cpu / 7.0).abs() < 1e-9, "{process:?}");
        let devices = process.devices.unwrap_or_default() as f64;
        let per_connection = process.cpu_ms_per_connection.expect("per connection");
        assert!((per_connection - cpu / devices).abs() < 1e-9, "{process:?}");
        assert!(process.rss_kib.is_some_and(|k| k > 0), "{process:?}");
    }
    assert!(report
        .processes_cpu_ms_per_device
        .is_some_and(|ms| ms > 0.0));

    let json = serde_json::to_value(&report).expect("report as JSON");
    assert_eq!(json["processes"][1]["name"], "edge-b");
    assert!(
        json["processes"][0]["cpu_ms_per_connection"].is_number(),
        "{json}"
    );
    assert!(json["processes_cpu_ms_per_device"].is_number(), "{json}");
}
