{{/*
Names are fixed (statefabric-*): one release per cluster, and the sidecars,
the webhook and the docs refer to these names.
*/}}

{{- define "statefabric.labels" -}}
app.kubernetes.io/part-of: statefabric
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{- define "statefabric.image" -}}
{{- $root := index . 0 -}}
{{- printf "%s/%s:%s" $root.Values.image.registry (index . 1) ($root.Values.image.tag | default $root.Chart.AppVersion) -}}
{{- end }}

{{- define "statefabric.controlPlaneAddress" -}}
{{- .Values.injector.controlPlaneAddress | default (printf "https://statefabric-control-plane.%s.svc:7504" .Release.Namespace) -}}
{{- end }}

{{/* A restricted-profile security context for our containers. */}}
{{- define "statefabric.securityContext" -}}
runAsNonRoot: true
runAsUser: 65532
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities: {drop: [ALL]}
seccompProfile: {type: RuntimeDefault}
{{- end }}

{{/* Spread replicas over nodes (preferred, so a one-node cluster still installs). */}}
{{- define "statefabric.antiAffinity" -}}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
  - weight: 100
    podAffinityTerm:
      topologyKey: kubernetes.io/hostname
      labelSelector:
        matchLabels: {app.kubernetes.io/name: {{ . }}}
{{- end }}
