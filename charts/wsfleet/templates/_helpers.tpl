{{/* Names and labels shared by every template. */}}

{{/* The chart name, or nameOverride. */}}
{{- define "wsfleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The name of every object: fullnameOverride, else the release name (plus the chart name
unless the release name already contains it). */}}
{{- define "wsfleet.fullname" -}}
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

{{/* The leader-election Lease (in the release namespace). */}}
{{- define "wsfleet.leaseName" -}}
{{- printf "%s-leader" (include "wsfleet.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select the operator pods. The component label keeps them apart from the pods
of the WebSocketClusters (component server, redis or tuning). */}}
{{- define "wsfleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "wsfleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Labels of every object of the release. */}}
{{- define "wsfleet.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "wsfleet.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: wsfleet
{{- end }}

{{/* The namespace of the node-tuning DaemonSets. */}}
{{- define "wsfleet.tuningNamespace" -}}
{{- .Values.nodeTuning.namespace | default (printf "%s-tuning" .Release.Namespace) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The node tuner's image. */}}
{{- define "wsfleet.tunerImage" -}}
{{- printf "%s:%s" .Values.nodeTuning.image.repository (.Values.nodeTuning.image.tag | default .Chart.AppVersion) }}
{{- end }}
