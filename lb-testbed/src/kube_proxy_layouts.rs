//! kube-proxy's Service rule layouts, reproduced for the side-by-side benchmark: the iptables-mode
//! chains (for `iptables-restore`) and the nftables-mode table (for `nft -f`) for a synthetic
//! cluster, plus the same cluster as Services and EndpointSlices for lb. These reproduce the
//! layouts kube-proxy writes (chain structure, matches, random endpoint choice, masquerade
//! marking); they are not kube-proxy itself.

use std::{fmt::Write as _, net::Ipv4Addr};

/// The tool that loads the iptables layout: the legacy (x_tables) backend. The nf_tables backend's
/// `iptables-restore` (1.8.9 here) slows down quadratically with the number of chains: 18 s for
/// 2,000 Services of 2-10 endpoints where the legacy one takes 0.7 s, so 10,000 would take minutes
/// per load. kube-proxy uses whichever backend the node's iptables uses.
pub const IPTABLES_RESTORE: &str = "iptables-legacy-restore";
/// The matching `iptables-save`.
pub const IPTABLES_SAVE: &str = "iptables-legacy-save";

/// The transport protocol of a synthetic Service's port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// As iptables and nft spell it.
    pub fn lower(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }

    /// As a Service manifest spells it.
    pub fn upper(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

/// One synthetic Service: a ClusterIP port, usually with a NodePort, and its endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyntheticService {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub protocol: Protocol,
    pub port: u16,
    /// `None`: a ClusterIP Service.
    pub node_port: Option<u16>,
    /// (pod address, target port)
    pub endpoints: Vec<(Ipv4Addr, u16)>,
}

/// How many synthetic Services get a NodePort.
pub const SYNTHETIC_NODE_PORTS: usize = 20_000;

/// `count` Services in 10.96.0.0/12 with 2-10 endpoints each in 10.200.0.0/14 (addresses no
/// testbed pod has), then the `measured` ones last, where iptables' linear KUBE-SERVICES reaches
/// them last.
pub fn synthetic_cluster(
    count: usize,
    measured: impl IntoIterator<Item = SyntheticService>,
) -> Vec<SyntheticService> {
    let mut services = Vec::with_capacity(count + 4);
    let mut next_pod = u32::from(Ipv4Addr::new(10, 200, 0, 1));
    for i in 0..count {
        let endpoints = (0..2 + i % 9)
            .map(|_| {
                let pod = Ipv4Addr::from(next_pod);
                next_pod += 1;
                (pod, 8080)
            })
            .collect();
        services.push(SyntheticService {
            namespace: "bench".to_owned(),
            name: format!("svc-{i}"),
            // 10.97.0.0 upwards: clear of the testbed's own Services in 10.96.0.0/16.
            cluster_ip: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 97, 0, 0)) + i as u32),
            protocol: Protocol::Tcp,
            port: 80,
            // The NodePort range is only 2768 wide: synthetic ones live in the 40000s, which no
            // measured Service uses. Past 20,000 Services the rest are ClusterIP-only, since the
            // API server never lets two Services share a NodePort.
            node_port: (i < SYNTHETIC_NODE_PORTS).then(|| 40000 + i as u16),
            endpoints,
        });
    }
    services.extend(measured);
    services
}

/// kube-proxy's chain-name suffix: a stable hash of what the chain is for.
fn chain_suffix(parts: &[&str]) -> String {
    // FNV-1a, 64 bits: stable across runs and platforms, and plenty for distinct names.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.bytes().chain(std::iter::once(0)) {
            hash ^= byte as u64;
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{hash:016X}")
}

/// kube-proxy's names for a Service port: `namespace/name:port`, its protocol, and the suffix
/// of its chains.
fn service_names(svc: &SyntheticService) -> (String, &'static str, String) {
    let name = format!("{}/{}:port", svc.namespace, svc.name);
    let proto = svc.protocol.lower();
    let suffix = chain_suffix(&[&name, proto]);
    (name, proto, suffix)
}

/// The suffix of an endpoint's chain.
fn endpoint_suffix(name: &str, proto: &str, (pod, target): (Ipv4Addr, u16)) -> String {
    chain_suffix(&[name, proto, &format!("{pod}:{target}")])
}

/// One Service's part of the iptables-mode layout.
struct IptablesService {
    /// Chains of its own (KUBE-SVC, KUBE-EXT, KUBE-SEP-*), declared (and so flushed) on restore.
    chains: Vec<String>,
    /// Its rule in KUBE-SERVICES.
    cluster_ip_rule: String,
    /// Its rule in KUBE-NODEPORTS, if it has a NodePort.
    node_port_rule: Option<String>,
    /// The rules of its own chains.
    rules: String,
}

fn iptables_service(svc: &SyntheticService, cluster_cidr: &str) -> IptablesService {
    let (name, proto, suffix) = service_names(svc);
    let (svc_chain, ext_chain) = (format!("KUBE-SVC-{suffix}"), format!("KUBE-EXT-{suffix}"));
    let (ip, port, np) = (svc.cluster_ip, svc.port, svc.node_port);
    let mut rules = format!(
        "-A {ext_chain} -m comment --comment \"masquerade traffic for {name} external destinations\" -j KUBE-MARK-MASQ\n\
         -A {ext_chain} -j {svc_chain}\n\
         -A {svc_chain} ! -s {cluster_cidr} -d {ip}/32 -p {proto} -m comment --comment \"{name} cluster IP\" -m {proto} --dport {port} -j KUBE-MARK-MASQ\n"
    );
    let mut chains = vec![svc_chain.clone(), ext_chain.clone()];
    let n = svc.endpoints.len();
    for (i, (pod, target)) in svc.endpoints.iter().enumerate() {
        let sep = format!(
            "KUBE-SEP-{}",
            endpoint_suffix(&name, proto, (*pod, *target))
        );
        // Endpoint i of n is taken with probability 1/(n-i), so each gets 1/n overall.
        let choice = if i + 1 < n {
            format!(
                " -m statistic --mode random --probability {:.11}",
                1.0 / (n - i) as f64
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            rules,
            "-A {svc_chain} -m comment --comment \"{name} -> {pod}:{target}\"{choice} -j {sep}\n\
             -A {sep} -s {pod}/32 -m comment --comment \"{name}\" -j KUBE-MARK-MASQ\n\
             -A {sep} -p {proto} -m comment --comment \"{name}\" -m {proto} -j DNAT --to-destination {pod}:{target}"
        );
        chains.push(sep);
    }
    IptablesService {
        chains,
        cluster_ip_rule: format!(
            "-A KUBE-SERVICES -d {ip}/32 -p {proto} -m comment --comment \"{name} cluster IP\" -m {proto} --dport {port} -j {svc_chain}"
        ),
        node_port_rule: np.map(|np| format!(
            "-A KUBE-NODEPORTS -p {proto} -m comment --comment \"{name}\" -m {proto} --dport {np} -j {ext_chain}"
        )),
        rules,
    }
}

/// `*nat` with the chains declared, KUBE-SERVICES and KUBE-NODEPORTS in full, the `own` Services'
/// chains and `extra` rules: what both a full load and a partial sync write.
fn iptables_nat_table(
    services: &[SyntheticService],
    own: &[&SyntheticService],
    cluster_cidr: &str,
    extra_chains: &[&str],
    extra_rules: &str,
) -> String {
    let own: Vec<IptablesService> = own
        .iter()
        .map(|svc| iptables_service(svc, cluster_cidr))
        .collect();
    let mut out = String::from("*nat\n");
    let declared = ["KUBE-SERVICES", "KUBE-NODEPORTS"]
        .iter()
        .chain(extra_chains)
        .map(|c| c.to_string())
        .chain(own.iter().flat_map(|s| s.chains.iter().cloned()));
    for chain in declared {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    out.push_str(extra_rules);
    for svc in services {
        let pieces = iptables_service(svc, cluster_cidr);
        let _ = writeln!(out, "{}", pieces.cluster_ip_rule);
        if let Some(rule) = pieces.node_port_rule {
            let _ = writeln!(out, "{rule}");
        }
    }
    for svc in &own {
        out.push_str(&svc.rules);
    }
    out.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\nCOMMIT\n",
    );
    out
}

/// The iptables-mode layout as `iptables-restore --noflush` input for the nat table.
/// `cluster_cidr` is kube-proxy's `--cluster-cidr`: traffic from outside it to a ClusterIP is
/// masqueraded.
pub fn iptables_restore(services: &[SyntheticService], cluster_cidr: &str) -> String {
    let all: Vec<&SyntheticService> = services.iter().collect();
    iptables_nat_table(
        services,
        &all,
        cluster_cidr,
        &["KUBE-POSTROUTING", "KUBE-MARK-MASQ"],
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n",
    )
}

/// What kube-proxy's iptables mode restores when one Service changed with `services` present (a
/// partial sync): KUBE-SERVICES and KUBE-NODEPORTS rewritten whole, plus the changed Service's
/// own chains.
pub fn iptables_partial_sync(
    services: &[SyntheticService],
    changed: &SyntheticService,
    cluster_cidr: &str,
) -> String {
    iptables_nat_table(services, &[changed], cluster_cidr, &[], "")
}

/// One Service's chains in the nftables-mode layout, and its map elements.
struct NftService {
    chain_names: Vec<String>,
    chains: String,
    service_ip: String,
    node_port: Option<String>,
}

fn nft_service(svc: &SyntheticService, cluster_cidr: &str) -> NftService {
    let (name, proto, suffix) = service_names(svc);
    let (svc_chain, ext_chain) = (format!("service-{suffix}"), format!("external-{suffix}"));
    let mut chains = String::new();
    let mut chain_names = vec![svc_chain.clone(), ext_chain.clone()];
    let mut endpoints = Vec::new();
    for (i, (pod, target)) in svc.endpoints.iter().enumerate() {
        let chain = format!(
            "endpoint-{}",
            endpoint_suffix(&name, proto, (*pod, *target))
        );
        let _ = writeln!(
            chains,
            "\tchain {chain} {{ ip saddr {pod} jump mark-for-masquerade; meta l4proto {proto} dnat to {pod}:{target}; }}"
        );
        endpoints.push(format!("{i} : goto {chain}"));
        chain_names.push(chain);
    }
    let _ = writeln!(
        chains,
        "\tchain {svc_chain} {{ ip daddr {ip} {proto} dport {port} ip saddr != {cluster_cidr} jump mark-for-masquerade; numgen random mod {n} vmap {{ {eps} }}; }}\n\
         \tchain {ext_chain} {{ jump mark-for-masquerade; goto {svc_chain}; }}",
        ip = svc.cluster_ip,
        port = svc.port,
        n = svc.endpoints.len(),
        eps = endpoints.join(", "),
    );
    NftService {
        chain_names,
        chains,
        service_ip: format!(
            "{} . {proto} . {} : goto {svc_chain}",
            svc.cluster_ip, svc.port
        ),
        node_port: svc
            .node_port
            .map(|np| format!("{proto} . {np} : goto {ext_chain}")),
    }
}

/// The nftables-mode layout as `nft -f` input: one `ip kube-proxy` table whose `services` chain
/// finds a Service with a single verdict-map lookup.
pub fn nft_script(services: &[SyntheticService], cluster_cidr: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "table ip kube-proxy {{\n\
         \tchain nat-prerouting {{ type nat hook prerouting priority dstnat; policy accept; jump services; }}\n\
         \tchain nat-output {{ type nat hook output priority -100; policy accept; jump services; }}\n\
         \tchain nat-postrouting {{ type nat hook postrouting priority srcnat; policy accept; jump masquerading; }}\n\
         \tchain mark-for-masquerade {{ mark set mark or 0x4000; }}\n\
         \tchain masquerading {{ mark and 0x4000 == 0 return; mark set mark xor 0x4000; masquerade fully-random; }}"
    );
    let mut service_ips = Vec::new();
    let mut node_ports = Vec::new();
    for svc in services {
        let pieces = nft_service(svc, cluster_cidr);
        out.push_str(&pieces.chains);
        service_ips.push(pieces.service_ip);
        node_ports.extend(pieces.node_port);
    }
    let _ = writeln!(
        out,
        "\tmap service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict; elements = {{ {} }}; }}\n\
         \tmap service-nodeports {{ type inet_proto . inet_service : verdict; elements = {{ {} }}; }}\n\
         \tchain services {{\n\
         \t\tip daddr . meta l4proto . th dport vmap @service-ips\n\
         \t\tfib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports\n\
         \t}}\n}}",
        service_ips.join(", "),
        node_ports.join(", "),
    );
    out
}

/// What kube-proxy's nftables mode sends when one Service's endpoints changed: that Service's
/// chains (new ones created) flushed and rewritten, in one transaction; the maps stay.
pub fn nft_partial_sync(changed: &SyntheticService, cluster_cidr: &str) -> String {
    let pieces = nft_service(changed, cluster_cidr);
    let mut out = String::new();
    for chain in &pieces.chain_names {
        let _ = writeln!(
            out,
            "add chain ip kube-proxy {chain}\nflush chain ip kube-proxy {chain}"
        );
    }
    let _ = writeln!(out, "table ip kube-proxy {{\n{}}}", pieces.chains);
    out
}

/// The same cluster as Services and EndpointSlices, for `lb agent --manifests`.
pub fn manifests_yaml(services: &[SyntheticService]) -> String {
    let mut out = String::new();
    for svc in services {
        let _ = writeln!(
            out,
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {n}, namespace: {ns}}}\n\
             spec: {{type: {kind}, clusterIP: {ip}, ports: [{{name: port, protocol: {proto}, port: {port}{np}}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {n}-1, namespace: {ns}, labels: {{kubernetes.io/service-name: {n}}}}}\n\
             addressType: IPv4\nports: [{{name: port, protocol: {proto}, port: {tp}}}]\nendpoints:",
            n = svc.name,
            ns = svc.namespace,
            ip = svc.cluster_ip,
            port = svc.port,
            proto = svc.protocol.upper(),
            kind = if svc.node_port.is_some() {
                "NodePort"
            } else {
                "ClusterIP"
            },
            np = svc
                .node_port
                .map_or_else(String::new, |np| format!(", nodePort: {np}")),
            tp = svc.endpoints.first().map_or(8080, |e| e.1),
        );
        for (pod, _) in &svc.endpoints {
            let _ = writeln!(out, "- addresses: [\"{pod}\"]");
        }
        let _ = writeln!(out, "---");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured() -> SyntheticService {
        SyntheticService {
            namespace: "demo".to_owned(),
            name: "measured".to_owned(),
            cluster_ip: Ipv4Addr::new(10, 96, 0, 10),
            protocol: Protocol::Tcp,
            port: 80,
            node_port: Some(30080),
            endpoints: vec![
                (Ipv4Addr::new(10, 244, 2, 11), 8080),
                (Ipv4Addr::new(10, 244, 2, 12), 8080),
                (Ipv4Addr::new(10, 244, 2, 13), 8080),
            ],
        }
    }

    #[test]
    fn the_measured_service_comes_last_and_sizes_vary() {
        let cluster = synthetic_cluster(100, [measured()]);
        assert_eq!(cluster.len(), 101);
        assert_eq!(cluster.last().unwrap().name, "measured");
        let sizes: std::collections::BTreeSet<usize> =
            cluster[..100].iter().map(|s| s.endpoints.len()).collect();
        assert_eq!(sizes, (2..=10).collect());
        let ips: std::collections::BTreeSet<Ipv4Addr> =
            cluster.iter().map(|s| s.cluster_ip).collect();
        assert_eq!(ips.len(), 101, "distinct ClusterIPs");
    }

    #[test]
    fn iptables_layout_has_kube_proxys_chains_and_even_random_choice() {
        let text = iptables_restore(&synthetic_cluster(3, [measured()]), "10.244.0.0/16");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.first(), Some(&"*nat"));
        assert_eq!(lines.last(), Some(&"COMMIT"));
        let services: Vec<&&str> = lines
            .iter()
            .filter(|l| l.starts_with("-A KUBE-SERVICES "))
            .collect();
        assert_eq!(services.len(), 5, "4 Services, then the NodePort jump");
        assert!(
            services[3].contains("-d 10.96.0.10/32"),
            "measured last: {}",
            services[3]
        );
        assert!(services[4].contains("-j KUBE-NODEPORTS"));
        // Three endpoints: 1/3, then 1/2, then the rest.
        let svc_chain = services[3].rsplit(' ').next().unwrap();
        let choices: Vec<&&str> = lines
            .iter()
            .filter(|l| l.starts_with(&format!("-A {svc_chain} -m comment")))
            .collect();
        assert_eq!(choices.len(), 3);
        assert!(choices[0].contains("--probability 0.33333333333"));
        assert!(choices[1].contains("--probability 0.50000000000"));
        assert!(!choices[2].contains("--probability"));
        assert_eq!(
            lines
                .iter()
                .filter(|l| l.contains("-j DNAT --to-destination 10.244.2.1"))
                .count(),
            3
        );
        // Every chain used is declared.
        for line in lines.iter().filter(|l| l.starts_with("-A ")) {
            let target = line
                .rsplit("-j ")
                .next()
                .unwrap()
                .split(' ')
                .next()
                .unwrap();
            if target.starts_with("KUBE-") {
                assert!(
                    text.contains(&format!(":{target} - [0:0]")),
                    "{target} declared"
                );
            }
        }
    }

    #[test]
    fn nftables_layout_finds_services_with_one_map_lookup() {
        let text = nft_script(&synthetic_cluster(3, [measured()]), "10.244.0.0/16");
        assert!(text.contains("ip daddr . meta l4proto . th dport vmap @service-ips"));
        assert!(text.contains("10.96.0.10 . tcp . 80 : goto service-"));
        assert!(text.contains("numgen random mod 3 vmap"));
        assert_eq!(text.matches("dnat to 10.244.2.1").count(), 3);
        assert_eq!(
            text.matches('{').count(),
            text.matches('}').count(),
            "balanced braces"
        );
    }

    #[test]
    fn lb_gets_the_same_cluster_as_manifests() {
        let cluster = synthetic_cluster(3, [measured()]);
        let yaml = manifests_yaml(&cluster);
        assert_eq!(yaml.matches("kind: Service\n").count(), 4);
        assert_eq!(yaml.matches("kind: EndpointSlice").count(), 4);
        assert!(yaml.contains("clusterIP: 10.96.0.10"));
        assert_eq!(yaml.matches("- addresses: [\"10.244.2.1").count(), 3);
    }
}

/// The generated rules load into the real tools, inside a namespace of the test's own.
#[cfg(test)]
mod load {
    use super::*;
    use crate::netns::Netns;

    fn tools_present() -> bool {
        let root = nix::unistd::Uid::effective().is_root();
        let present = |tool: &str| {
            std::process::Command::new(tool)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if root && present(IPTABLES_RESTORE) && present("nft") {
            return true;
        }
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI runs as root with iptables and nftables installed (.ci/run installs them)"
        );
        eprintln!(
            "SKIPPED layouts_load_into_iptables_and_nft: needs root, {IPTABLES_RESTORE} and nft"
        );
        false
    }

    fn load_in(ns: &Netns, tool: &str, args: &[&str], input: String) {
        if let Err(err) = ns.pipe(tool, args, &input) {
            panic!("{tool} refused the layout: {err:#}");
        }
    }

    #[test]
    fn layouts_load_into_iptables_and_nft() {
        if !tools_present() {
            return;
        }
        let ns = Netns::create(&format!(
            "{}{}-layouts",
            crate::cleanup::NETNS_PREFIX,
            std::process::id()
        ))
        .expect("namespace");
        let measured = SyntheticService {
            namespace: "demo".to_owned(),
            name: "measured".to_owned(),
            cluster_ip: Ipv4Addr::new(10, 96, 0, 10),
            protocol: Protocol::Tcp,
            port: 80,
            node_port: Some(30080),
            endpoints: vec![(Ipv4Addr::new(10, 244, 2, 11), 8080)],
        };
        let udp = SyntheticService {
            name: "measured-udp".to_owned(),
            cluster_ip: Ipv4Addr::new(10, 96, 0, 11),
            protocol: Protocol::Udp,
            node_port: Some(30081),
            ..measured.clone()
        };
        let cluster = synthetic_cluster(50, [measured, udp]);
        load_in(
            &ns,
            IPTABLES_RESTORE,
            &["--noflush"],
            iptables_restore(&cluster, "10.244.0.0/16"),
        );
        load_in(
            &ns,
            "nft",
            &["-f", "-"],
            nft_script(&cluster, "10.244.0.0/16"),
        );

        // One Service gains an endpoint: the partial syncs apply on top and leave one copy of
        // every Service rule.
        let mut changed = cluster[7].clone();
        changed.endpoints.push((Ipv4Addr::new(10, 244, 9, 9), 8080));
        let mut after = cluster.clone();
        after[7] = changed.clone();
        load_in(
            &ns,
            IPTABLES_RESTORE,
            &["--noflush"],
            iptables_partial_sync(&after, &changed, "10.244.0.0/16"),
        );
        load_in(
            &ns,
            "nft",
            &["-f", "-"],
            nft_partial_sync(&changed, "10.244.0.0/16"),
        );
        let saved = output_in(&ns, IPTABLES_SAVE, &["-t", "nat"]);
        assert_eq!(
            saved.matches("-A KUBE-SERVICES ").count(),
            cluster.len() + 1,
            "KUBE-SERVICES rewritten, not appended to"
        );
        assert_eq!(saved.matches("--to-destination 10.244.9.9:8080").count(), 1);
        let ruleset = output_in(&ns, "nft", &["list", "table", "ip", "kube-proxy"]);
        assert_eq!(ruleset.matches("dnat to 10.244.9.9:8080").count(), 1);
        assert_eq!(
            ruleset
                .matches(&format!(
                    "numgen random mod {} vmap",
                    changed.endpoints.len()
                ))
                .count(),
            1 + cluster
                .iter()
                .filter(|s| s.endpoints.len() == changed.endpoints.len())
                .count(),
            "the changed Service's chain picks among its new endpoint count"
        );
    }

    fn output_in(ns: &Netns, tool: &str, args: &[&str]) -> String {
        ns.pipe(tool, args, "").expect("listing the rules")
    }
}
