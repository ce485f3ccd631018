{{/* Chart name, truncated to the 63 chars of a DNS label. */}}
{{- define "istio-ext-authz.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-qualified unless the release name already contains the chart name. */}}
{{- define "istio-ext-authz.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "istio-ext-authz.selectorLabels" -}}
app.kubernetes.io/name: {{ include "istio-ext-authz.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "istio-ext-authz.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "istio-ext-authz.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "istio-ext-authz.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "istio-ext-authz.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "istio-ext-authz.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "istio-ext-authz.policiesConfigMap" -}}
{{- .Values.policies.existingConfigMap | default (printf "%s-policies" (include "istio-ext-authz.fullname" .)) }}
{{- end }}

{{/* FQDN of the central server's Service: the provider's `service` in the mesh config. */}}
{{- define "istio-ext-authz.serviceFQDN" -}}
{{ include "istio-ext-authz.fullname" . }}.{{ .Release.Namespace }}.svc.{{ .Values.clusterDomain }}
{{- end }}

{{/*
The static workload identity of the central server, as YAML {kind, namespace, labels}: explicit
server.workload values win. With istio.identity.enabled every caller says who it is on each Check
(the EnvoyFilters below), so nothing is derived: a static value would be applied to every caller
that sends none. Without it the identity is derived from the one enabled mode, and enabling more
than one is refused (one static identity cannot be right for several kinds of callers).
*/}}
{{- define "istio-ext-authz.workload" -}}
{{- $w := .Values.server.workload }}
{{- $i := .Values.istio }}
{{- $kind := "sidecar" }}
{{- $ns := "" }}
{{- $labels := dict }}
{{- $modes := list }}
{{- range $mode := list "ingressGateway" "egressGateway" "mesh" "ambient" }}
{{- if (get $i $mode).enabled }}{{ $modes = append $modes $mode }}{{ end }}
{{- end }}
{{- if not $i.identity.enabled }}
{{- if gt (len $modes) 1 }}
{{- fail (printf "istio.identity.enabled=false: the server has one static workload identity, so enable one of %s per release (or turn istio.identity on)" (join ", " $modes)) }}
{{- end }}
{{- if $i.ingressGateway.enabled }}
{{- $kind = "gateway" }}{{ $ns = $i.ingressGateway.namespace }}{{ $labels = $i.ingressGateway.selector }}
{{- else if $i.egressGateway.enabled }}
{{- $kind = "gateway" }}{{ $ns = $i.egressGateway.namespace }}{{ $labels = $i.egressGateway.selector }}
{{- else if $i.ambient.enabled }}
{{- $kind = "waypoint" }}{{ $ns = $i.ambient.namespace | default .Release.Namespace }}
{{- $labels = dict "gateway.networking.k8s.io/gateway-name" $i.ambient.waypoint }}
{{- end }}
{{- end }}
kind: {{ $w.kind | default $kind }}
namespace: {{ $w.namespace | default $ns | quote }}
labels: {{ $w.labels | default $labels | toJson }}
{{- end }}

{{/*
An EnvoyFilter that MERGEs the proxy's identity into Istio's own ext_authz filter (README "One
release for the whole mesh"). Args: root, name, namespace, context (SIDECAR_INBOUND, GATEWAY,
WAYPOINT), kind, optionally selector (dict: workloadSelector) or targetRefs (list), and
trustedProxies (gateways). The patch is what authz_server.demo.envoy_config.IdentityMerge applies
in the e2e tests; tests/deploy checks the two agree.
*/}}
{{- define "istio-ext-authz.identityEnvoyFilter" -}}
{{- $id := .root.Values.istio.identity }}
{{- $filter := dict "name" "envoy.filters.network.http_connection_manager" "subFilter" (dict "name" "envoy.filters.http.ext_authz") }}
{{- $metadata := list (dict "key" "x-authz-workload-namespace" "value" .namespace) (dict "key" "x-authz-workload-kind" "value" .kind) }}
{{- if hasKey . "trustedProxies" }}
{{- $metadata = append $metadata (dict "key" "x-authz-num-trusted-proxies" "value" (toString .trustedProxies)) }}
{{- end }}
apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata:
  name: {{ .name }}
  namespace: {{ .namespace }}
  labels:
    {{- include "istio-ext-authz.labels" .root | nindent 4 }}
spec:
  {{- with get . "selector" }}
  workloadSelector:
    labels:
      {{- toYaml . | nindent 6 }}
  {{- end }}
  {{- with get . "targetRefs" }}
  targetRefs:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  configPatches:
    - applyTo: HTTP_FILTER
      match:
        context: {{ .context }}
        {{- if eq .context "WAYPOINT" }}
        waypoint:
          filter:
            {{- toYaml $filter | nindent 12 }}
        {{- else }}
        listener:
          filterChain:
            filter:
              {{- toYaml $filter | nindent 14 }}
        {{- end }}
      patch:
        operation: MERGE
        value:
          name: envoy.filters.http.ext_authz
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
            # the pod's labels (Istio's node metadata LABELS) as destination.labels
            bootstrap_metadata_labels_key: {{ $id.labelsKey | quote }}
            # repeated headers value by value (a DENY on one value cannot be bypassed by a second)
            encode_raw_headers: {{ $id.encodeRawHeaders }}
            # the SNI, for connection.sni rules
            include_tls_session: {{ $id.includeTlsSession }}
            grpc_service:
              # gRPC metadata of every Check call: who this proxy is (a client cannot set it)
              initial_metadata:
                {{- toYaml $metadata | nindent 16 }}
{{- end }}

{{/* "k1=v1,k2=v2" (sorted) for AUTHZ_WORKLOAD_LABELS. */}}
{{- define "istio-ext-authz.labelList" -}}
{{- $out := list }}
{{- range $k, $v := . }}{{ $out = append $out (printf "%s=%s" $k $v) }}{{ end }}
{{- join "," $out }}
{{- end }}

{{/*
Server settings shared by the central Deployment and the sidecar-local container, as env vars
(the server reads every flag from AUTHZ_*).
*/}}
{{- define "istio-ext-authz.commonEnv" -}}
- name: AUTHZ_POLICIES
  value: /etc/authz/policies
- name: AUTHZ_ROOT_NAMESPACE
  value: {{ .Values.server.rootNamespace | quote }}
- name: AUTHZ_TRUST_DOMAIN
  value: {{ .Values.server.trustDomain | quote }}
- name: AUTHZ_NUM_TRUSTED_PROXIES
  value: {{ .Values.server.numTrustedProxies | quote }}
- name: AUTHZ_LOG_LEVEL
  value: {{ .Values.server.logLevel | quote }}
- name: AUTHZ_ALLOW_EMPTY_POLICIES
  value: {{ .Values.policies.allowEmpty | quote }}
- name: AUTHZ_MAX_PENDING_CHECKS
  value: {{ .Values.server.overload.maxPendingChecks | quote }}
- name: AUTHZ_MAX_QUEUE_DELAY
  value: {{ .Values.server.overload.maxQueueDelay | quote }}
{{- end }}

{{- define "istio-ext-authz.policiesVolume" -}}
- name: policies
  configMap:
    name: {{ include "istio-ext-authz.policiesConfigMap" . }}
{{- end }}

{{/*
The server as an extra container of an application pod (sidecar-local mode). Pass the chart's
root context; the pod must also get the volumes from "istio-ext-authz.sidecarVolumes" and
carry the labels given here as `labels` (a dict), which the server uses as its workload labels:
  {{ include "istio-ext-authz.sidecarContainer" (dict "root" $ "labels" $podLabels) }}
The namespace comes from the downward API, so the same snippet works in every namespace.
gRPC listens on 127.0.0.1 only: the sidecar's Envoy reaches it through the ServiceEntry host,
nothing outside the pod can. Probes use the HTTP endpoints, which kubelet reaches on the pod IP.
*/}}
{{- define "istio-ext-authz.sidecarContainer" -}}
{{- $root := .root }}
{{- $s := $root.Values.sidecarLocal -}}
- name: ext-authz
  image: {{ include "istio-ext-authz.image" $root }}
  imagePullPolicy: {{ $root.Values.image.pullPolicy }}
  args: ["serve"]
  env:
    {{- include "istio-ext-authz.commonEnv" $root | nindent 4 }}
    - name: AUTHZ_LISTEN
      value: "127.0.0.1:{{ $s.grpcPort }}"
    - name: AUTHZ_METRICS_LISTEN
      value: "0.0.0.0:{{ $s.metricsPort }}"
    # One process: a sidecar serves one pod's traffic.
    - name: AUTHZ_WORKERS
      value: "1"
    - name: AUTHZ_WORKLOAD_KIND
      value: sidecar
    - name: AUTHZ_WORKLOAD_NAMESPACE
      valueFrom:
        fieldRef:
          fieldPath: metadata.namespace
    - name: AUTHZ_WORKLOAD_LABELS
      value: {{ include "istio-ext-authz.labelList" .labels | quote }}
  ports:
    - name: authz-metrics
      containerPort: {{ $s.metricsPort }}
  readinessProbe:
    httpGet:
      path: /readyz
      port: authz-metrics
    periodSeconds: 5
  livenessProbe:
    httpGet:
      path: /healthz
      port: authz-metrics
    periodSeconds: 10
    failureThreshold: 3
  resources:
    {{- toYaml $s.resources | nindent 4 }}
  securityContext:
    {{- toYaml $root.Values.server.securityContext | nindent 4 }}
  volumeMounts:
    - name: authz-policies
      mountPath: /etc/authz/policies
      readOnly: true
    - name: authz-tmp
      mountPath: /tmp
{{- end }}

{{/* Volumes the sidecar container mounts (names prefixed to avoid clashing with the app's). */}}
{{- define "istio-ext-authz.sidecarVolumes" -}}
- name: authz-policies
  configMap:
    name: {{ include "istio-ext-authz.policiesConfigMap" . }}
- name: authz-tmp
  emptyDir:
    sizeLimit: 64Mi
{{- end }}

{{/* meshConfig.extensionProviders entries for the enabled servers (YAML list). */}}
{{- define "istio-ext-authz.extensionProviders" -}}
{{- $p := .Values.istio.provider }}
{{- if not (regexMatch "^[0-9]+(\\.[0-9]+)?(ns|us|ms|s|m|h)$" $p.timeout) }}
{{- fail (printf "istio.provider.timeout %q: must be a duration string such as 500ms or 1s" $p.timeout) }}
{{- end }}
{{- if .Values.server.enabled }}
- name: {{ $p.name }}
  envoyExtAuthzGrpc:
    service: {{ include "istio-ext-authz.serviceFQDN" . }}
    port: {{ .Values.server.grpcPort }}
    timeout: {{ $p.timeout }}
    failOpen: {{ $p.failOpen }}
    statusOnError: {{ $p.statusOnError | quote }}
{{- end }}
{{- if .Values.sidecarLocal.enabled }}
- name: {{ .Values.sidecarLocal.providerName }}
  envoyExtAuthzGrpc:
    service: {{ .Values.sidecarLocal.host }}
    port: {{ .Values.sidecarLocal.grpcPort }}
    timeout: {{ $p.timeout }}
    failOpen: {{ $p.failOpen }}
    statusOnError: {{ $p.statusOnError | quote }}
{{- end }}
{{- end }}

{{/* A CUSTOM AuthorizationPolicy. Args: root, name, namespace, provider, rules, and optionally
either selector (dict) or targetRefs (list). */}}
{{- define "istio-ext-authz.customPolicy" -}}
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: {{ .name }}
  namespace: {{ .namespace }}
  labels:
    {{- include "istio-ext-authz.labels" .root | nindent 4 }}
spec:
  {{- with get . "selector" }}
  selector:
    matchLabels:
      {{- toYaml . | nindent 6 }}
  {{- end }}
  {{- with get . "targetRefs" }}
  targetRefs:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  action: CUSTOM
  provider:
    name: {{ .provider }}
  rules:
    {{- toYaml .rules | nindent 4 }}
{{- end }}
