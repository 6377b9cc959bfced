{{- define "modelpilot.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "modelpilot.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "modelpilot.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "modelpilot.serviceAccountName" -}}
{{- default (include "modelpilot.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{/* The rules the operator needs, and nothing more: see operator/modelpilot/adapters/kube.py. */}}
{{- define "modelpilot.rules" -}}
- apiGroups: [modelpilot.io]
  resources: [modeldeployments]
  verbs: [get, list, watch, patch]
- apiGroups: [modelpilot.io]
  resources: [modeldeployments/status]
  verbs: [get, patch]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [services, configmaps, persistentvolumeclaims]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, list, watch, create, patch, delete]
# Each ModelDeployment's admin-token Secret: written (server-side apply), never read (the
# token derives from the operator's key).
- apiGroups: [""]
  resources: [secrets]
  verbs: [create, patch]
# Live settings go to the ready pods; a pod becoming Ready is checked at once.
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]
- apiGroups: ["", events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end -}}

{{/* Where the Prometheus CA bundle and credentials are mounted: modelpilot.adapters.prometheus reads
     the files these environment variables name (PrometheusConfig.from_env). */}}
{{- define "modelpilot.prometheusEnv" -}}
{{- $p := .Values.prometheus -}}
- {name: MODELPILOT_PROMETHEUS_URL, value: {{ $p.url | quote }}}
- {name: MODELPILOT_PROMETHEUS_ALLOWED_URLS, value: {{ join "," ($p.allowedUrls | default list) | quote }}}
- {name: MODELPILOT_PROMETHEUS_INSECURE_SKIP_VERIFY, value: {{ $p.insecureSkipVerify | default false | quote }}}
{{- if $p.caBundle }}
- {name: MODELPILOT_PROMETHEUS_CA_FILE, value: /etc/modelpilot/prometheus/ca/ca.crt}
{{- end }}
{{- $auth := $p.auth | default dict }}
{{- if eq ($auth.type | default "none") "bearer" }}
- {name: MODELPILOT_PROMETHEUS_TOKEN_FILE, value: /etc/modelpilot/prometheus/auth/token}
{{- else if eq ($auth.type | default "none") "basic" }}
- {name: MODELPILOT_PROMETHEUS_USERNAME_FILE, value: /etc/modelpilot/prometheus/auth/username}
- {name: MODELPILOT_PROMETHEUS_PASSWORD_FILE, value: /etc/modelpilot/prometheus/auth/password}
{{- end }}
{{- end -}}

{{- define "modelpilot.prometheusVolumeMounts" -}}
{{- $p := .Values.prometheus -}}
{{- if $p.caBundle }}
- {name: prometheus-ca, mountPath: /etc/modelpilot/prometheus/ca, readOnly: true}
{{- end }}
{{- if ne (($p.auth | default dict).type | default "none") "none" }}
- {name: prometheus-auth, mountPath: /etc/modelpilot/prometheus/auth, readOnly: true}
{{- end }}
{{- end -}}

{{- define "modelpilot.prometheusVolumes" -}}
{{- $p := .Values.prometheus -}}
{{- with $p.caBundle }}
- name: prometheus-ca
  {{- if .configMap }}
  configMap:
    name: {{ required "prometheus.caBundle.configMap.name is required" .configMap.name }}
    items: [{key: {{ required "prometheus.caBundle.configMap.key is required" .configMap.key | quote }}, path: ca.crt}]
  {{- else if .secret }}
  secret:
    secretName: {{ required "prometheus.caBundle.secret.name is required" .secret.name }}
    items: [{key: {{ required "prometheus.caBundle.secret.key is required" .secret.key | quote }}, path: ca.crt}]
  {{- else }}
  {{- fail "prometheus.caBundle: set configMap: {name, key} or secret: {name, key}" }}
  {{- end }}
{{- end }}
{{- $auth := $p.auth | default dict }}
{{- $type := $auth.type | default "none" }}
{{- if ne $type "none" }}
- name: prometheus-auth
  secret:
    secretName: {{ required (printf "prometheus.auth.secretName is required with auth.type %s" $type) $auth.secretName }}
    items:
      {{- if eq $type "bearer" }}
      - {key: {{ $auth.tokenKey | default "token" | quote }}, path: token}
      {{- else }}
      - {key: {{ $auth.usernameKey | default "username" | quote }}, path: username}
      - {key: {{ $auth.passwordKey | default "password" | quote }}, path: password}
      {{- end }}
{{- end }}
{{- end -}}

{{/* The PodMonitor's target labels: those of annotation-based scraping with the usual
     labelmap (modelpilot.adapters.prometheus.INSTANCE_LABEL is among them). */}}
{{- define "modelpilot.podRelabelings" -}}
- {action: labelmap, regex: __meta_kubernetes_pod_label_(.+)}
- {sourceLabels: [__meta_kubernetes_namespace], targetLabel: namespace}
- {sourceLabels: [__meta_kubernetes_pod_name], targetLabel: pod}
{{- end -}}
