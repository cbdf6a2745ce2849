//! The Helm chart (`charts/wsfleet`) against the real local control plane: `helm lint` passes;
//! the chart's version is the workspace's; its CRD is the generated one; the rendered manifests
//! are accepted by the API server (restricted Pod Security included); the operator binary,
//! authenticated only by a token of the chart's ServiceAccount, reconciles a sample through the
//! whole scenario of `wsfleet_e2e::chart`; and every permission of the chart's RBAC is needed:
//! with any one (resource, verb) taken away, the scenario fails and the operator's log holds the
//! API server's refusal of exactly that verb.
//!
//! The operator Deployment itself is never applied: kwok would only fake its pods. The tests run
//! the operator binary with the Deployment's arguments and environment instead.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;
use wsfleet_e2e::chart::{
    ChartOperator, ClusterScoped, OperatorLaunch, Outcome, Permission, Run, ServiceAccountKubeconfig, chart_dir,
    documents, drive, find, helm_run, install_without_deployment, kind_of, render, rendered_deployment, repo_root,
    server_dry_run, to_json,
};
use wsfleet_e2e::{TestNamespace, kubectl, kubectl_run, unique_name, wait_until};

/// The operator of the installed chart watches every namespace, so while one runs no other
/// operator test of this file may (each would reconcile the other's samples).
fn cluster_wide() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn read(path: &str) -> String {
    let path = repo_root().join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The value of the first `key: value` line (quotes removed) after the line `section`.
fn field(text: &str, section: &str, key: &str) -> String {
    let after = text.split_once(section).map_or(text, |(_, rest)| rest);
    after
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")).or_else(|| l.strip_prefix(&format!("{key} ="))))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .unwrap_or_else(|| panic!("no {key} after {section:?}"))
}

fn install_crd() {
    static ONCE: Mutex<bool> = Mutex::new(false);
    let mut done = ONCE.lock().unwrap_or_else(|p| p.into_inner());
    if !*done {
        let crd = render("wsfleet", "default", &["crds.install=true"]);
        let crd: Vec<String> =
            documents(&crd).into_iter().filter(|d| kind_of(d) == "CustomResourceDefinition").collect();
        wsfleet_e2e::install_crd(&crd.join("---\n"), "websocketclusters.wsfleet.dev");
        *done = true;
    }
}

/// The container arguments of a rendered Deployment, and one of them by flag.
fn arg(deployment: &Value, flag: &str) -> String {
    let args = deployment["spec"]["template"]["spec"]["containers"][0]["args"].as_array().expect("args");
    args.iter()
        .filter_map(Value::as_str)
        .find_map(|a| a.strip_prefix(&format!("{flag}=")))
        .unwrap_or_else(|| panic!("the Deployment passes no {flag}"))
        .to_owned()
}

#[test]
fn helm_lint_passes() {
    let chart = chart_dir();
    let chart = chart.to_str().unwrap();
    for sets in [&[][..], &["--set", "metrics.serviceMonitor.enabled=true", "--set", "crds.install=false"][..]] {
        let mut args = vec!["lint", "--strict", chart];
        args.extend_from_slice(sets);
        let (ok, stdout, stderr) = helm_run(&args);
        assert!(ok, "helm {} failed:\n{stdout}\n{stderr}", args.join(" "));
        assert!(stdout.contains("0 chart(s) failed"), "{stdout}");
    }
}

#[test]
fn every_value_is_documented() {
    // A comment directly above every key of values.yaml, except inside the blocks that are
    // Kubernetes objects passed through as they are (documented as a whole).
    let passed_through = ["podSecurityContext", "securityContext", "resources"];
    let values = read("charts/wsfleet/values.yaml");
    let mut parents: Vec<(usize, &str)> = Vec::new();
    let mut previous = "";
    let mut undocumented = Vec::new();
    for line in values.lines().filter(|l| !l.trim().is_empty()) {
        let indent = line.len() - line.trim_start().len();
        let key = line
            .trim_start()
            .split_once(':')
            .map(|(k, _)| k)
            .filter(|k| !k.starts_with('#') && !k.starts_with('-') && k.chars().all(|c| c.is_ascii_alphanumeric()));
        if let Some(key) = key {
            parents.retain(|(i, _)| *i < indent);
            let inside = parents.iter().any(|(_, p)| passed_through.contains(p));
            if !inside && !previous.trim_start().starts_with('#') {
                undocumented.push(key);
            }
            parents.push((indent, key));
        }
        previous = line;
    }
    assert!(undocumented.is_empty(), "values.yaml keys without a comment above them: {undocumented:?}");
}

#[test]
fn the_chart_is_released_with_the_workspace_version_and_images() {
    let workspace = field(&read("Cargo.toml"), "[workspace.package]", "version");
    let chart = read("charts/wsfleet/Chart.yaml");
    assert_eq!(field(&chart, "", "appVersion"), workspace, "Chart.yaml appVersion");
    assert_eq!(field(&chart, "", "version"), workspace, "Chart.yaml version");
    // The operator image defaults to the appVersion; the server image the CRD defaults to (which
    // the operator puts in every server Deployment) is the same release.
    let rendered = render("wsfleet", "wsfleet-system", &[]);
    let operator = format!("image: \"ghcr.io/wsfleet/wsfleet-operator:{workspace}\"");
    assert!(rendered.contains(&operator), "the Deployment does not run {operator}");
    let server = format!("default: ghcr.io/wsfleet/wsfleet-server:{workspace}");
    assert!(rendered.contains(&server), "the CRD's default server image is not {server}");
}

#[test]
fn the_chart_crd_is_the_generated_crd() {
    let generated = read("crds/websocketcluster.yaml");
    let copy = read("charts/wsfleet/files/crds/websocketcluster.yaml");
    assert!(
        copy == generated,
        "charts/wsfleet/files/crds/websocketcluster.yaml differs from crds/websocketcluster.yaml: run `make generate`"
    );
    let without = render("wsfleet", "wsfleet-system", &["crds.install=false"]);
    assert!(!documents(&without).iter().any(|d| kind_of(d) == "CustomResourceDefinition"), "crds.install=false");

    // As rendered: the same CRD (compared as objects), plus the keep annotation and labels.
    let rendered = render("wsfleet", "wsfleet-system", &[]);
    let rendered: Vec<String> =
        documents(&rendered).into_iter().filter(|d| kind_of(d) == "CustomResourceDefinition").collect();
    assert_eq!(rendered.len(), 1);
    let (rendered, generated) = (to_json(&rendered[0]).remove(0), to_json(&generated).remove(0));
    assert_eq!(rendered["spec"], generated["spec"], "the chart changes the CRD's spec");
    assert_eq!(rendered["metadata"]["name"], generated["metadata"]["name"]);
    assert_eq!(rendered["metadata"]["annotations"]["helm.sh/resource-policy"], "keep");
}

#[test]
fn the_rendered_chart_is_accepted_by_the_api_server() {
    let ns = TestNamespace::new("chart-dry");
    // The API server's Pod Security admission warns about any workload that breaks the level.
    kubectl(&["label", "namespace", &ns.name, "pod-security.kubernetes.io/enforce=restricted"]);
    // A dry run creates no namespace: the tuning namespace exists beforehand (the chart's
    // Namespace is then an update of it).
    let tuning = TestNamespace::new("chart-dry-tuning");
    let release = unique_name("wsfleet-dry");
    let tuning_value = format!("nodeTuning.namespace={}", tuning.name);
    let yaml = render(&release, &ns.name, &[&tuning_value]);
    let (objects, warnings) = server_dry_run(&yaml);
    let mut kinds: Vec<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "CustomResourceDefinition",
            "Deployment",
            "Namespace",
            "Role",
            "Role",
            "RoleBinding",
            "RoleBinding",
            "Service",
            "ServiceAccount"
        ]
    );
    assert!(!warnings.contains("PodSecurity"), "not restricted: {warnings}");
    // The tuning namespace allows privileged pods, and only there may the operator write
    // DaemonSets; the tuner image is the chart's server image.
    let namespace = find(&objects, "Namespace");
    assert_eq!(namespace["metadata"]["name"], tuning.name.as_str());
    assert_eq!(namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"], "privileged");
    let roles: Vec<&Value> = objects.iter().filter(|o| o["kind"] == "Role").collect();
    let daemonsets: Vec<&Value> =
        roles.iter().copied().filter(|r| r["rules"].to_string().contains("daemonsets")).collect();
    assert_eq!(daemonsets.len(), 1);
    assert_eq!(daemonsets[0]["metadata"]["namespace"], tuning.name.as_str());
    assert!(!find(&objects, "ClusterRole")["rules"].to_string().contains("daemonsets"));

    // The operator Deployment as the API server has it.
    let deployment = find(&objects, "Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let args = container["args"].to_string();
    assert!(!args.contains("no-leader-election") && !args.contains("watch-namespace"), "{args}");
    assert_eq!(arg(deployment, "--http-listen"), "0.0.0.0:8080");
    assert_eq!(arg(deployment, "--tuning-namespace"), tuning.name);
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(arg(deployment, "--tuner-image"), format!("ghcr.io/wsfleet/wsfleet-server:{version}"));
    assert_eq!(pod["serviceAccountName"], find(&objects, "ServiceAccount")["metadata"]["name"]);
    let env = |name: &str| container["env"].as_array().unwrap().iter().find(|e| e["name"] == name).cloned();
    assert_eq!(env("POD_NAMESPACE").unwrap()["valueFrom"]["fieldRef"]["fieldPath"], "metadata.namespace");
    assert_eq!(env("POD_NAME").unwrap()["valueFrom"]["fieldRef"]["fieldPath"], "metadata.name");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["ports"][0]["containerPort"], 8080);
    assert!(container["resources"]["requests"]["memory"].is_string());
    let sc = &container["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"][0], "ALL");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
    // The metrics Service selects the operator pods.
    let service = find(&objects, "Service");
    let selector = service["spec"]["selector"].as_object().unwrap();
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    assert!(selector.iter().all(|(k, v)| labels[k] == *v), "{selector:?} vs {labels}");
    // The Lease's Role is namespaced to the release and names the Lease the operator uses.
    let role = roles.iter().find(|r| r["rules"].to_string().contains("leases")).expect("the Lease's Role");
    assert_eq!(role["metadata"]["namespace"], ns.name.as_str());
    assert!(role["rules"].to_string().contains(&arg(deployment, "--lease-name")));

    // The ServiceMonitor only when asked for (its CRD is not in this cluster: checked as text).
    assert!(!yaml.contains("kind: ServiceMonitor"));
    let monitored = render(&release, &ns.name, &["metrics.serviceMonitor.enabled=true"]);
    let monitor: Vec<String> = documents(&monitored).into_iter().filter(|d| kind_of(d) == "ServiceMonitor").collect();
    assert_eq!(monitor.len(), 1, "{monitored}");
    assert!(monitor[0].contains("- port: http-metrics") && monitor[0].contains("path: /metrics"), "{}", monitor[0]);
    assert_eq!(service["spec"]["ports"][0]["name"], "http-metrics");
}

#[test]
fn the_operator_reconciles_on_the_chart_service_account_alone() {
    let _only_me = cluster_wide();
    let release_ns = TestNamespace::new("chart-release");
    let app_ns = TestNamespace::new("chart-app");
    let release = unique_name("wsfleet");
    // The release as installed, CRD included (crds.install defaults to true).
    let yaml = render(&release, &release_ns.name, &[]);
    let (objects, _cluster_scoped) = install_without_deployment(&yaml);
    wsfleet_e2e::wait_until("the CRD to be established", std::time::Duration::from_secs(60), || {
        let s = kubectl(&[
            "get",
            "crd",
            "websocketclusters.wsfleet.dev",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Established\")].status}",
        ]);
        if s.trim() == "True" { Ok(()) } else { Err(s) }
    });
    let account = find(&objects, "ServiceAccount")["metadata"]["name"].as_str().unwrap().to_owned();
    kubectl(&["-n", &release_ns.name, "get", "serviceaccount", &account]);
    let deployment = rendered_deployment(&yaml);
    let kubeconfig = ServiceAccountKubeconfig::new(&release_ns.name, &account);

    kubectl_run(&["-n", &app_ns.name, "apply", "-f", "-"], Some(&read("operator/examples/chat.yaml"))).ok();
    let operator = ChartOperator::start(OperatorLaunch {
        deployment: &deployment,
        namespace: &release_ns.name,
        kubeconfig: &kubeconfig.path,
        extra: &[],
        env: &[],
    });
    let lease = (
        release_ns.name.clone(),
        arg(&deployment, "--lease-name"),
        Duration::from_secs(arg(&deployment, "--lease-duration").parse().unwrap()),
    );
    let mut run = Run::new("as installed".into(), app_ns.name.clone(), lease, operator);
    let took = drive(&mut [&mut run]);
    match &run.outcome {
        Some(Outcome::Passed { .. }) => {
            eprintln!("the chart's ServiceAccount reconciled the sample through every step in {took:?}")
        }
        other => panic!("{other:?}\noperator log:\n{}", run.operator.tail(40)),
    }
}

/// Everything one minimality run keeps alive until the end of the test.
struct Variant {
    removed: Option<Permission>,
    run: Run,
    _kubeconfig: ServiceAccountKubeconfig,
    _cluster_scoped: ClusterScoped,
    _namespace: TestNamespace,
}

/// A release of the chart in its own namespace, with `removed` taken out of its RBAC, and the
/// operator running on its ServiceAccount, watching only that namespace (so that the runs can
/// go side by side; the ClusterRoleBinding grants the same in every namespace).
fn variant(removed: Option<Permission>, lease_seconds: u64) -> Variant {
    let ns = TestNamespace::new("chart-min");
    let release = unique_name("wsfleet-min");
    let sets = [
        "crds.install=false".to_owned(),
        format!("leaderElection.leaseDurationSeconds={lease_seconds}"),
        "resyncSeconds=3600".to_owned(),
    ];
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let yaml = render(&release, &ns.name, &sets);
    let (objects, cluster_scoped) = install_without_deployment(&yaml);
    let account = find(&objects, "ServiceAccount")["metadata"]["name"].as_str().unwrap().to_owned();
    if let Some(wanted) = &removed {
        // This release's own permission (a Lease rule names this release's Lease).
        let (holder, ref p) = objects
            .iter()
            .filter(|o| o["kind"] == "ClusterRole" || o["kind"] == "Role")
            .find_map(|o| Permission::all(&o["rules"]).into_iter().find(|p| p.same_grant(wanted)).map(|p| (o, p)))
            .expect("the permission is the chart's");
        // A Role's permission is asked about in its namespace (the tuning namespace's Role).
        let where_ = holder["metadata"]["namespace"].as_str().unwrap_or(&ns.name).to_owned();
        let mut reduced = holder.clone();
        reduced["rules"] = p.remove_from(&holder["rules"]);
        kubectl_run(&["replace", "-f", "-"], Some(&reduced.to_string())).ok();
        let who = format!("--as=system:serviceaccount:{}:{account}", ns.name);
        let mut can_i = vec!["auth".to_owned(), "can-i".to_owned()];
        can_i.extend(p.can_i_args());
        can_i.extend(["-n".to_owned(), where_, who]);
        let can_i: Vec<&str> = can_i.iter().map(String::as_str).collect();
        wait_until(&format!("the API server to refuse {p}"), Duration::from_secs(10), || {
            let answer = kubectl_run(&can_i, None).stdout;
            if answer.trim() == "no" { Ok(()) } else { Err(answer) }
        });
    }
    let deployment = rendered_deployment(&yaml);
    let kubeconfig = ServiceAccountKubeconfig::new(&ns.name, &account);
    // The sample exists before the operator starts: its first list includes it.
    kubectl_run(&["-n", &ns.name, "apply", "-f", "-"], Some(&read("operator/examples/chat.yaml"))).ok();
    let operator = ChartOperator::start(OperatorLaunch {
        deployment: &deployment,
        namespace: &ns.name,
        kubeconfig: &kubeconfig.path,
        extra: &["--watch-namespace", &ns.name],
        // Event failures are logged at debug level.
        env: &[("WSFLEET_LOG", "info,wsfleet_operator=debug")],
    });
    let label = removed.as_ref().map_or("nothing removed".to_owned(), |p| format!("without {p}"));
    let lease = (ns.name.clone(), arg(&deployment, "--lease-name"), Duration::from_secs(lease_seconds));
    let run = Run::new(label, ns.name.clone(), lease, operator);
    Variant { removed, run, _kubeconfig: kubeconfig, _cluster_scoped: cluster_scoped, _namespace: ns }
}

/// The controller's watches of the children: without list or watch on a child kind, its watch
/// never starts (the log repeats the refusal at every retry), but kube-runtime reconciles the
/// cluster at each failed retry (about once a second), and those reconciles re-apply every
/// child. So drift of that kind is still repaired, late and at the price of a failed LIST per
/// second: whether a step of the scenario fails depends on timing. For these the test requires
/// the repeated refusal, and reports the scenario's outcome without requiring a failure.
fn watch_of_a_child(p: &Permission) -> bool {
    matches!(p.verb.as_str(), "list" | "watch")
        && matches!(
            p.resource.as_str(),
            "deployments" | "services" | "poddisruptionbudgets" | "daemonsets" | "networkpolicies"
        )
}

/// An outcome's reason without the Debug dump of the API server's Status.
fn short(why: &str) -> &str {
    let mut end = why.find(": Forbidden (").unwrap_or(why.len()).min(240);
    while !why.is_char_boundary(end) {
        end -= 1;
    }
    &why[..end]
}

#[test]
fn every_permission_of_the_chart_is_needed() {
    let _only_me = cluster_wide();
    install_crd();
    let started = Instant::now();
    // The permissions, one (API group, resource, verb) each, as the chart grants them.
    let rbac: Vec<String> = documents(&render("wsfleet", "wsfleet-system", &[]))
        .into_iter()
        .filter(|d| matches!(kind_of(d), "ClusterRole" | "Role"))
        .collect();
    let rendered = to_json(&rbac.join("---\n"));
    let permissions: Vec<Permission> = rendered.iter().flat_map(|o| Permission::all(&o["rules"])).collect();
    assert!(permissions.len() >= 20, "{permissions:?}");

    // One control run with everything, one run per permission taken away, all side by side.
    // WSFLEET_CHART_ONLY=TEXT keeps the runs whose label contains TEXT ("control" for the control).
    let only = std::env::var("WSFLEET_CHART_ONLY").unwrap_or_default();
    let wanted: Vec<Option<Permission>> = std::iter::once(None)
        .chain(permissions.into_iter().map(Some))
        .filter(|p| only.is_empty() || p.as_ref().map_or(only == "control", |p| p.to_string().contains(&only)))
        .collect();
    let mut variants: Vec<Variant> = std::thread::scope(|scope| {
        let handles: Vec<_> = wanted.iter().map(|p| scope.spawn(|| variant(p.clone(), 6))).collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).collect()
    });
    let set_up = started.elapsed();
    let driven = drive(&mut variants.iter_mut().map(|v| &mut v.run).collect::<Vec<_>>());

    let mut report = Vec::new();
    let mut wrong = Vec::new();
    for Variant { removed, run, .. } in &variants {
        let log = run.operator.log();
        let outcome = run.outcome.clone().expect("every run ends");
        let what = match &outcome {
            Outcome::Passed { took } => format!("every step passed in {took:.1?}"),
            Outcome::Failed { step, why, after } => {
                format!("fails at \"{}\" after {after:.1?}: {}", step.what(), short(why))
            }
        };
        let Some(p) = removed else {
            // The control: everything works, and nothing is refused.
            report.push(format!("{:<52} {what}", run.label));
            let refused: Vec<&String> = log.iter().filter(|l| l.contains("forbidden")).collect();
            if matches!(outcome, Outcome::Failed { .. }) || !refused.is_empty() {
                wrong.push(format!("{}: {what}; refused: {refused:?}\n{}", run.label, run.operator.tail(30)));
            }
            continue;
        };
        // The API server refused exactly this permission: the operator asks for it.
        let refusals = log.iter().filter(|l| l.contains(&p.refusal())).count();
        report.push(format!("{:<52} {what} (refused {refusals}x)", run.label));
        if refusals == 0 {
            wrong.push(format!("{}: the log never shows {:?}:\n{}", run.label, p.refusal(), run.operator.tail(30)));
        } else if watch_of_a_child(p) {
            if refusals < 3 {
                wrong.push(format!("{}: the watch was refused only {refusals} time(s)", run.label));
            }
        } else if matches!(outcome, Outcome::Passed { .. }) {
            wrong.push(format!("{}: every step passed: this permission is not needed", run.label));
        }
    }
    if std::env::var_os("WSFLEET_CHART_LOGS").is_some() {
        for v in &variants {
            eprintln!("=== {}\n{}", v.run.label, v.run.operator.log().join("\n"));
        }
    }
    eprintln!("set up {} runs in {set_up:.1?}, drove them in {driven:.1?}:\n{}", variants.len(), report.join("\n"));
    assert!(wrong.is_empty(), "{}", wrong.join("\n\n"));
}
