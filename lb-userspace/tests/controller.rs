//! The Kubernetes controller against a fake API server over real HTTP (a real kube::Client,
//! real list and watch), on loopback (no root needed) or, for the health-check servers, in a
//! network namespace of the test's own: programmed state follows adds, updates and deletes; a
//! relist after `410 Gone` loses nothing and flushes nothing; a bad object is reported without
//! stopping the others; kube-proxy's label rules; an API server that is down at start.

mod support;

use std::time::Duration;

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use lb_userspace::translate::NodeContext;
use support::{
    controller::{
        ApiHarness, Controller, local_load_balancer, node, service, set, slice, slice_triggered_at,
        with_label,
    },
    privileged,
};

fn node_1() -> NodeContext {
    NodeContext {
        name: Some("node-1".to_owned()),
        addresses: vec!["172.30.0.11".parse().unwrap()],
        ..NodeContext::default()
    }
}

/// A dual-stack Service from the API server: both ClusterIPs programmed, each with the
/// endpoints of its family's slice; a family's slice deleted empties that family's frontend
/// only; the Service turned single-stack (IPv4) removes its IPv6 frontend.
#[test]
fn dual_stack_services_follow_both_families_slices() {
    let api = ApiHarness::on_loopback("dual-stack");
    api.fake.apply(&node("node-1", "zone-a"));
    let dual = || {
        let mut svc = service("shop", "web", "10.96.0.7");
        let spec = svc.spec.as_mut().unwrap();
        spec.ip_families = Some(vec!["IPv4".to_owned(), "IPv6".to_owned()]);
        spec.ip_family_policy = Some("PreferDualStack".to_owned());
        spec.cluster_ips = Some(vec!["10.96.0.7".to_owned(), "fd00:96::7".to_owned()]);
        svc
    };
    api.fake.apply(&dual());
    api.fake
        .apply(&slice("shop", "web-v4", "web", &[("10.244.1.7", "node-1")]));
    api.fake.apply(&slice(
        "shop",
        "web-v6",
        "web",
        &[("fd00:244:1::7", "node-1"), ("fd00:244:2::7", "node-2")],
    ));
    let kubeconfig = api.kubeconfig.clone();
    let fake = api.fake.clone_handle();
    api.run(move || async move {
        let mut ctl = Controller::start(&kubeconfig, node_1()).await;
        ctl.wait_until("both families", |c| {
            let f = c.frontends();
            f.get("10.96.0.7:80/TCP") == Some(&set(&["10.244.1.7:8080"]))
                && f.get("[fd00:96::7]:80/TCP")
                    == Some(&set(&["[fd00:244:1::7]:8080", "[fd00:244:2::7]:8080"]))
        })
        .await;
        assert!(fake.delete::<EndpointSlice>("shop", "web-v6"));
        ctl.wait_until("the IPv6 slice gone", |c| {
            let f = c.frontends();
            f.get("10.96.0.7:80/TCP") == Some(&set(&["10.244.1.7:8080"]))
                && f.get("[fd00:96::7]:80/TCP") == Some(&set(&[]))
        })
        .await;
        let mut single = dual();
        let spec = single.spec.as_mut().unwrap();
        spec.ip_families = Some(vec!["IPv4".to_owned()]);
        spec.ip_family_policy = Some("SingleStack".to_owned());
        spec.cluster_ips = Some(vec!["10.96.0.7".to_owned()]);
        fake.apply(&single);
        ctl.wait_until("single-stack again", |c| {
            let f = c.frontends();
            f.len() == 1 && f.contains_key("10.96.0.7:80/TCP")
        })
        .await;
    });
}

#[test]
fn programmed_state_follows_adds_updates_and_deletes() {
    let api = ApiHarness::on_loopback("follow");
    api.fake.apply(&node("node-1", "zone-a"));
    api.fake.apply(&service("shop", "web", "10.96.0.1"));
    api.fake.apply(&slice_triggered_at(
        "shop",
        "web-1",
        "web",
        &[("10.244.1.1", "node-1")],
        "2026-01-01T00:00:00Z",
    ));
    let kubeconfig = api.kubeconfig.clone();
    let fake = api.fake.clone_handle();
    api.run(move || async move {
        let mut ctl = Controller::start(&kubeconfig, node_1()).await;
        ctl.wait_until("the first list", |c| {
            c.frontends().get("10.96.0.1:80/TCP") == Some(&set(&["10.244.1.1:8080"]))
        })
        .await;
        assert_eq!(
            ctl.source.node_zone().as_deref(),
            Some("zone-a"),
            "its own Node is watched"
        );

        // A second slice for the same Service: merged.
        fake.apply(&slice("shop", "web-2", "web", &[("10.244.2.1", "node-2")]));
        ctl.wait_until("the second slice", |c| {
            c.frontends().get("10.96.0.1:80/TCP")
                == Some(&set(&["10.244.1.1:8080", "10.244.2.1:8080"]))
        })
        .await;
        assert!(ctl.triggers.is_empty(), "the first list predates the agent");
        // An updated endpoint list, with the time its change was triggered: the start of
        // lb_network_programming_duration_seconds.
        fake.apply(&slice_triggered_at(
            "shop",
            "web-1",
            "web",
            &[("10.244.1.9", "node-1")],
            "2026-01-02T03:04:05.5Z",
        ));
        ctl.wait_until("the updated slice", |c| {
            c.frontends().get("10.96.0.1:80/TCP")
                == Some(&set(&["10.244.1.9:8080", "10.244.2.1:8080"]))
        })
        .await;
        let triggered = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_767_323_045_500);
        assert_eq!(ctl.triggers, [triggered]);
        // A deleted slice: its endpoints go.
        assert!(fake.delete::<EndpointSlice>("shop", "web-2"));
        ctl.wait_until("the slice deletion", |c| {
            c.frontends().get("10.96.0.1:80/TCP") == Some(&set(&["10.244.1.9:8080"]))
        })
        .await;
        // A new Service, then the first one deleted: the diff removes what is gone.
        fake.apply(&service("shop", "api", "10.96.0.2"));
        fake.apply(&slice("shop", "api-1", "api", &[("10.244.1.5", "node-1")]));
        assert!(fake.delete::<Service>("shop", "web"));
        ctl.wait_until("web gone, api there", |c| {
            let f = c.frontends();
            !f.contains_key("10.96.0.1:80/TCP")
                && f.get("10.96.0.2:80/TCP") == Some(&set(&["10.244.1.5:8080"]))
        })
        .await;
        assert!(
            ctl.maps
                .backends
                .values()
                .all(|b| b.addr_be
                    != lb_common::Address::to_wide(lb_common::addr_be([10, 244, 1, 9]))),
            "web's backend is removed"
        );
    });
}

#[test]
fn relist_after_410_gone_loses_nothing_and_flushes_nothing() {
    let api = ApiHarness::on_loopback("relist");
    api.fake.apply(&node("node-1", "zone-a"));
    for i in 0..20 {
        let name = format!("svc-{i}");
        api.fake
            .apply(&service("bulk", &name, &format!("10.96.1.{i}")));
        api.fake.apply(&slice(
            "bulk",
            &format!("{name}-1"),
            &name,
            &[(&format!("10.244.1.{}", i + 10), "node-1")],
        ));
    }
    let kubeconfig = api.kubeconfig.clone();
    let fake = api.fake.clone_handle();
    api.run(move || async move {
        let mut ctl = Controller::start(&kubeconfig, node_1()).await;
        ctl.wait_until("20 Services", |c| c.frontends().len() == 20)
            .await;
        let lists_before = (
            fake.requests("list services"),
            fake.requests("list endpointslices"),
        );
        let syncs_before = ctl.syncs.len();

        // History compacted and every watch dropped: resuming gets 410 Gone. A change made
        // meanwhile must still arrive, through the relist.
        fake.compact();
        fake.drop_watches();
        fake.apply(&slice(
            "bulk",
            "svc-3-1",
            "svc-3",
            &[("10.244.9.9", "node-1")],
        ));
        let relisted = fake.clone();
        ctl.wait_until(
            "both watchers to relist and the change made during the outage",
            move |c| {
                relisted.requests("list services") > lists_before.0
                    && relisted.requests("list endpointslices") > lists_before.1
                    && c.frontends().get("10.96.1.3:80/TCP") == Some(&set(&["10.244.9.9:8080"]))
            },
        )
        .await;
        assert_eq!(ctl.frontends().len(), 20, "nothing lost");
        let deletes: usize = ctl.syncs[syncs_before..].iter().map(|s| s.deletes).sum();
        assert_eq!(deletes, 1, "only svc-3's old backend is deleted: no flush");
    });
}

#[test]
fn a_bad_object_is_reported_and_does_not_stop_the_others() {
    let api = ApiHarness::on_loopback("bad");
    api.fake.apply(&node("node-1", "zone-a"));
    api.fake.apply(&service("t", "good", "10.96.0.1"));
    api.fake
        .apply(&slice("t", "good-1", "good", &[("10.244.1.1", "node-1")]));
    let kubeconfig = api.kubeconfig.clone();
    let fake = api.fake.clone_handle();
    api.run(move || async move {
        let mut ctl = Controller::start(&kubeconfig, node_1()).await;
        ctl.wait_until("good", |c| c.frontends().contains_key("10.96.0.1:80/TCP"))
            .await;
        // A Service that no API server validation would stop but lb cannot program, and one that
        // becomes invalid after being good.
        fake.apply(&service("t", "broken", "10.96.0.300"));
        let mut good = service("t", "good", "10.96.0.1");
        good.spec.as_mut().unwrap().session_affinity = Some("Sometimes".to_owned());
        fake.apply(&good);
        fake.apply(&service("t", "other", "10.96.0.3"));
        ctl.wait_until("other programmed, problems reported", |c| {
            c.frontends().contains_key("10.96.0.3:80/TCP") && c.problems.len() == 2
        })
        .await;
        let text: Vec<String> = ctl.problems.iter().map(ToString::to_string).collect();
        assert!(
            text.iter()
                .any(|p| p.contains("Service t/broken") && p.contains("10.96.0.300")),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|p| p.contains("Service t/good") && p.contains("sessionAffinity")),
            "{text:?}"
        );
        assert_eq!(
            ctl.frontends().get("10.96.0.1:80/TCP"),
            Some(&set(&["10.244.1.1:8080"])),
            "good keeps its last good version"
        );
    });
}

#[test]
fn service_proxy_name_and_headless_labels_are_honoured() {
    let api = ApiHarness::on_loopback("labels");
    api.fake.apply(&node("node-1", "zone-a"));
    api.fake.apply(&service("t", "plain", "10.96.0.1"));
    api.fake.apply(&with_label(
        service("t", "theirs", "10.96.0.2"),
        "service.kubernetes.io/service-proxy-name",
        "other-proxy",
    ));
    api.fake.apply(&with_label(
        service("t", "ours", "10.96.0.3"),
        "service.kubernetes.io/service-proxy-name",
        "lb",
    ));
    api.fake.apply(&with_label(
        service("t", "headless", "10.96.0.4"),
        "service.kubernetes.io/headless",
        "",
    ));
    let kubeconfig = api.kubeconfig.clone();
    api.run(move || async move {
        // The default agent: unlabelled Services only.
        let mut default = Controller::start(&kubeconfig, node_1()).await;
        default
            .wait_until("plain only", |c| {
                c.frontends().keys().cloned().collect::<Vec<_>>() == ["10.96.0.1:80/TCP"]
            })
            .await;
        let reasons: Vec<String> = default
            .desired()
            .unprogrammed
            .iter()
            .map(|u| format!("{}: {}", u.service, u.reason))
            .collect();
        assert!(
            reasons
                .iter()
                .any(|r| r.contains("t/theirs") && r.contains("other-proxy")),
            "{reasons:?}"
        );
        assert!(
            reasons
                .iter()
                .any(|r| r.contains("t/headless") && r.contains("headless")),
            "{reasons:?}"
        );
        // An agent that owns the name "lb": unlabelled and its own.
        let mut named = Controller::start(
            &kubeconfig,
            NodeContext {
                service_proxy_name: Some("lb".to_owned()),
                ..node_1()
            },
        )
        .await;
        named
            .wait_until("plain and ours", |c| {
                c.frontends().keys().cloned().collect::<Vec<_>>()
                    == ["10.96.0.1:80/TCP", "10.96.0.3:80/TCP"]
            })
            .await;
    });
}

#[test]
fn an_api_server_down_at_start_is_retried_while_nothing_is_flushed() {
    // A kubeconfig pointing at a port where nothing listens yet.
    let api = ApiHarness::on_loopback("down");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let kubeconfig = api.kubeconfig.clone();
    lb_testbed::fake_api::FakeApi::write_kubeconfig(
        &kubeconfig,
        &format!("http://127.0.0.1:{port}"),
    )
    .unwrap();
    let late = lb_testbed::fake_api::FakeApi::new().unwrap();
    late.apply(&node("node-1", "zone-a"));
    late.apply(&service("t", "web", "10.96.0.1"));
    late.apply(&slice("t", "web-1", "web", &[("10.244.1.1", "node-1")]));
    let late_handle = late.clone_handle();
    api.run(move || async move {
        let mut ctl = Controller::start(&kubeconfig, node_1()).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        ctl.sync();
        assert!(!ctl.source.ready(), "no list without an API server");
        assert!(
            ctl.syncs.is_empty(),
            "nothing is synced (so nothing pinned is flushed)"
        );
        // The API server comes up on that port; the watchers' backoff finds it.
        late_handle
            .listen(format!("127.0.0.1:{port}").parse().unwrap())
            .expect("listen");
        ctl.wait_until("the late API server's objects", |c| {
            c.frontends().contains_key("10.96.0.1:80/TCP")
        })
        .await;
    });
    drop(late);
}

#[test]
fn health_check_node_ports_answer_with_local_endpoints() {
    if !privileged("health_check_node_ports_answer_with_local_endpoints") {
        return;
    }
    let api = ApiHarness::in_namespace("hc");
    api.fake.apply(&node("node-1", "zone-a"));
    api.fake.apply(&local_load_balancer(
        "t",
        "here",
        "10.96.0.1",
        "172.30.1.1",
        32001,
    ));
    api.fake
        .apply(&slice("t", "here-1", "here", &[("10.244.1.1", "node-1")]));
    api.fake.apply(&local_load_balancer(
        "t",
        "elsewhere",
        "10.96.0.2",
        "172.30.1.2",
        32002,
    ));
    api.fake.apply(&slice(
        "t",
        "elsewhere-1",
        "elsewhere",
        &[("10.244.2.1", "node-2")],
    ));
    let kubeconfig = api.kubeconfig.clone();
    api.run(move || async move {
        let mut ctl = Controller::start(&kubeconfig, node_1()).await;
        ctl.wait_until("both health checks", |c| {
            c.desired().health_checks.len() == 2
        })
        .await;
        let mut servers = lb_userspace::health::HealthCheckServers::default();
        servers.reconcile(&ctl.desired().health_checks).await;
        let here = http_get("127.0.0.1:32001").await;
        assert!(here.starts_with("HTTP/1.1 200"), "{here}");
        assert!(here.contains("\"localEndpoints\":1"), "{here}");
        let elsewhere = http_get("127.0.0.1:32002").await;
        assert!(
            elsewhere.starts_with("HTTP/1.1 503"),
            "no local endpoint: {elsewhere}"
        );
        // The Service goes away: so does its server.
        servers.reconcile(&Default::default()).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            tokio::net::TcpStream::connect("127.0.0.1:32001")
                .await
                .is_err()
        );
    });
}

/// A plain HTTP/1.1 GET of `/` (no client library needed for one request).
async fn http_get(addr: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).await.unwrap();
    text
}
